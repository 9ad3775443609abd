"""HTTP routers, one module per resource: ``health`` (probes and metrics, no auth), ``datastores``,
``select``, ``influence``, ``similar`` and ``jobs`` (API key required). Each router carries its whole path
(``/v1/...``), so a route's template is its full path (the ``route`` label of the metrics)."""
