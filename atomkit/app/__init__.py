"""The interactive assembly app: an ipywidgets reel editor over one resident Session.

``AssemblyApp(session, paths)`` opens a library, and its ``widget`` is the whole page; ``atomkit app``
serves it with Voila (``atomkit.app.serve``). The state lives in plain objects (``atomkit.app.state``)."""
from atomkit.app.assembly import AssemblyApp, Cancelled
from atomkit.app.state import AppState, Cut, ReelEdit

__all__ = ["AppState", "AssemblyApp", "Cancelled", "Cut", "ReelEdit"]
