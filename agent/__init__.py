"""seedboot's boot agent: runs on the booting machine, inside the miniroot.

Never imports ``seedboot.tools``: the miniroot carries the agent alone.
"""
