"""Pure model and rules of ecsnap: no I/O, no framework imports."""
