"""Migrations into the log: ``deltalog import chroma`` and ``deltalog import pinecone``.

- ``pages``: how records read from a source become idempotent, byte-sized
  ``Upsert`` deltas (shared by both importers);
- ``chroma``: a Chroma persistent directory or server;
- ``pinecone``: Pinecone namespaces, through the official SDK (the
  ``pinecone`` extra).
"""
