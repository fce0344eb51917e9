"""The REST API: `create_app` builds it (`uvicorn --factory service.api.app:create_app`)."""
