"""`compressor tune`: a recipe chosen by latency measured on the target's engine.

``fingerprint`` names the host an engine profile was measured on; ``profile`` times every
candidate layer form and block shape in the engine (cached per host); ``sensitivity``
measures what each form costs in fidelity; ``search`` builds the Pareto front and picks a
plan under the budget; ``plan_recipe`` writes the plan as an ordinary recipe; ``tune``
runs the whole thing and verifies the chosen plan end to end.
"""
