"""The live dashboard: GET /dashboard on the server and on the router (see routes.py)."""

from shardserve.dashboard.routes import mount_router_dashboard, mount_server_dashboard

__all__ = ["mount_router_dashboard", "mount_server_dashboard"]
