"""The Hubble wire model, shared by every component that speaks it: the project's own
``.proto`` files (``api/``), records to and from Cilium's ``flow.Flow`` (``convert``,
``parse``), Hubble's text outputs (``printer``, ``summary``) and timestamps (``timefmt``)."""
