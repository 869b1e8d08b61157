"""HTTP serving: the popular web UI's API and a web page (ldmkit serve)."""
