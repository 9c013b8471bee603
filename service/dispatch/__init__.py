"""Runs on a Ray cluster: the dispatcher (dispatcher.py, a Ray driver that holds the database), the tasks
it submits (tasks.py) and the actor they report to (control.py). Needs the `dist` extra (ray, psycopg).

Nothing is imported here: a Ray worker that unpickles the RunControl actor imports this package, and
must not pay for torch on the way.
"""
