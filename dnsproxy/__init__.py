"""The FQDN-filtering DNS proxy (``flowtel dnsproxy``), its own process: see dnsproxy/README.md."""
