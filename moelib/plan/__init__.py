"""Planning a training run at cluster scale: memory per GPU, step time, bubble, exposed all-to-all, GPU-hours.

The top of the layering: it may import model, parallel and train; nothing in moelib imports it.
``hardware`` (GPU presets), ``activations`` (per-layer activation bytes measured on the real model),
``cache`` (those measurements kept on disk), ``memory`` (the per-GPU memory table), ``timing`` (chunk
durations through the schedule simulator), ``update`` (gradient sync, ZeRO all-gather and AdamW after the
pipeline), ``planner`` (one layout's plan, and the search over layouts). ``tools/plan.py`` is its command line.
"""
