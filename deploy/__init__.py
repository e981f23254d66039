"""The runtimes: the native one (`python -m deploy.native`) and the compose env files."""
