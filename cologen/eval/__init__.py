"""Evaluation: one loop (`loop.run_protocol(samples, generate, scorer)`), a scorer per benchmark (ShapeWorld,
DreamBench, MagicBrush / Emu Edit / GEdit-Bench, MultiGen-20M) and the protocols by name (`protocols.PROTOCOLS`,
`cologen eval PROTOCOL`)."""
