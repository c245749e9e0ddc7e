"""Services the agent offers people, listed in ``service.extensions`` (the Collector's extensions)."""
