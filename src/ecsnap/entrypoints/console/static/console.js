// The console's page behaviour, as a static file: the Content-Security-Policy allows no
// inline script or event handler attribute.
(function () {
  'use strict';
  // the region selector in the top bar submits its form when changed
  document.querySelectorAll('select[data-submit-on-change]').forEach(function (select) {
    select.addEventListener('change', function () { select.form.submit(); });
  });
  // forms that ask before they act: <form data-confirm="question">
  document.querySelectorAll('form[data-confirm]').forEach(function (form) {
    form.addEventListener('submit', function (event) {
      if (!window.confirm(form.getAttribute('data-confirm'))) { event.preventDefault(); }
    });
  });
  // a task in progress reloads its page: <div data-reload-after-ms="1000">
  var reload = document.querySelector('[data-reload-after-ms]');
  if (reload) {
    setTimeout(function () { location.reload(); },
               parseInt(reload.getAttribute('data-reload-after-ms'), 10) || 1000);
  }
})();
