// The serial console (Connect): xterm.js over the console's WebSocket, whose path the page
// gives in #terminal's data-serial-path.
(function () {
  'use strict';
  var el = document.getElementById('terminal');
  var term = new Terminal({convertEol: false, cursorBlink: true, fontSize: 14});
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  var proto = location.protocol === 'https:' ? 'wss://' : 'ws://';
  var ws = new WebSocket(proto + location.host + el.getAttribute('data-serial-path'));
  ws.binaryType = 'arraybuffer';
  var state = document.getElementById('conn-state');
  ws.onopen = function () { state.textContent = 'connected'; ws.send(new TextEncoder().encode('\r')); };
  ws.onclose = function () { state.textContent = 'disconnected'; };
  ws.onmessage = function (e) { term.write(new Uint8Array(e.data)); };
  term.onData(function (d) { if (ws.readyState === 1) ws.send(new TextEncoder().encode(d)); });
  window.ecsnapTerminal = term;
  term.focus();
})();
