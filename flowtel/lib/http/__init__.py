"""The bounded HTTP server every HTTP endpoint of the agent runs on (README.md here)."""
from flowtel.lib.http.config import BrowserFacingSettings, HTTPServerSettings
from flowtel.lib.http.request import HTTPError, Request, Response, ascii_int, ascii_only, bad_request
from flowtel.lib.http.server import BoundedHTTPServer, Handler, Limits, json_response

__all__ = [
    "BoundedHTTPServer", "BrowserFacingSettings", "HTTPError", "HTTPServerSettings", "Handler", "Limits",
    "Request", "Response", "ascii_int", "ascii_only", "bad_request", "json_response",
]
