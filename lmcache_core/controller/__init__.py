"""The cache controller: an HTTP API over an index of what every worker holds."""
