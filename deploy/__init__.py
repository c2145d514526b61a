"""Deployment: the typed application builder (deploy.app:build_app) and Serve configs."""
