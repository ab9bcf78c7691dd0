"""The governed path for other AI agents: an MCP server where agents read and propose, and only people approve.

- :mod:`firebreak.mcp.identity`: agents as roster identities (token hashes, receipt keys), the audit log, rate limits;
- :mod:`firebreak.mcp.server`: the tools and resources;
- :mod:`firebreak.mcp.cli`: ``firebreak mcp`` over stdio or streamable HTTP.
"""
