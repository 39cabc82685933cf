"""Reports: tables and plots built from run records on disk only (never imports methods,
engine or eval)."""
