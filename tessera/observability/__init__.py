"""Metrics and logs shared by the three processes (docs/observability.md).

`logs`: the JSON-lines / text log format, the redaction of secrets, the
request id of the call being served and the flags every executable has.
`metrics`: the Prometheus metrics (names fixed by the issue 9 contract),
the HTTP middleware of the REST services and the CSI plugin's tiny
/metrics server.
"""
