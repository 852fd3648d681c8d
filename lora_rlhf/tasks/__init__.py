"""Built-in tasks: offline, programmatically checkable prompts for demos and tests.

`ifeval_lite`  instruction following with verifiable constraints (lowercase, word limits, bullets, JSON, ...)
`demo_data`    builds the demo's prompt, PTX and held-out text files, and SFT demonstrations by best-of-n
"""
