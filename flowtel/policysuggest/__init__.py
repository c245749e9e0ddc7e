"""``flowtel policy suggest``: the least-privilege CiliumNetworkPolicy for what a workload did.

- :mod:`flowtel.policysuggest.derive`: observed flows in, a policy document out (pure).
- :mod:`flowtel.policysuggest.render`: that document as commented YAML or JSON (pure).
- :mod:`flowtel.policysuggest.cli`: the command line: reading flows from an agent or a file.
"""
from __future__ import annotations

from flowtel.policysuggest.render import to_json, to_yaml
from flowtel.policysuggest.derive import Options, Selection, SuggestError, Suggestion, suggest

__all__ = ["Options", "Selection", "SuggestError", "Suggestion", "suggest", "to_json", "to_yaml"]
