"""`llmaas check reliability`: campaigns that attack real `llmaas serve` processes and count what broke.

One module per campaign (crash, fuzz, isolation, soak), the shared harness (a service on a temporary data directory,
progress with an ETA, percentiles) and the runner (plan, table, JSON, report). Argument parsing lives in
`llmaas.cli.check` only.
"""
