"""Agents: tools the model calls while it thinks (a sandboxed Python kernel, bash, a browser over a
local corpus), the loop that runs them, and DeepSeek-V3.2's context management (spec §3-§4).

Every tool is a `dsv32.agent.tool.Tool`: a name, a JSON schema, one call -> one result string,
failures returned as results so that the loop never dies on them.
"""
