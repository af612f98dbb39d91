"""Use cases of ecsnap: one function per user action, shared by the API, the CLI and the console.

Each mutating function has the shape load -> check rules -> lock -> journal -> execute:
it checks everything first, then takes locks and writes a task (the journal) in one
transaction, then the task runner executes the task's steps (see `tasks.py`).
"""
