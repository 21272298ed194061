"""flows.web: the search service and its pages: app, routes, schemas, security, files."""
