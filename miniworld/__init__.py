"""Shapes-10, the project's mini world: rendered shape concepts, a tiny SD v1.x-architecture model trained on
them, and a judge that decides CRR. The runtime never imports this package; it only receives model folders."""
