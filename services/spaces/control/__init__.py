"""SpaceService: create, get, list, update and delete spaces."""
