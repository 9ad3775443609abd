"""HTTP routers, one module per resource: ``health`` (probes and metrics, no auth), ``datastores``,
``select``, ``influence``, ``similar``, ``jobs``, ``examples`` (pages and search), ``stats``,
``pool_map`` and ``summary`` (of a selection), with an API key; ``ui`` (the web UI's files, no
key). Each router carries its whole path (``/v1/...``), so a route's template is its full path
(the ``route`` label of the metrics)."""
