"""The client SDK: codec, result values, sync and asyncio clients, extract_many."""
