"""The ground floor: the config kernel (`core.config`) and file helpers (`core.files`).

Every layer (methods, engine, eval, runs, suites, reports) may import it; it imports none of them.
"""
