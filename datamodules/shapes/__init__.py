"""Built-in compositional shapes dataset, written as img2dataset-layout WebDataset shards.

`grammar` (objects, captions, parsing), `scene` (layout and drawing), `dataset` (splits, holdouts,
shard writer); `unclip data shapes` is the command.

Each sample is ``{key}.png`` (RGB, S x S, white background), ``{key}.txt`` (UTF-8 caption) and
``{key}.json`` (structured truth)::

    {"objects": [{"color": "red", "shape": "circle", "bbox": [x0, y0, x1, y1]}, ...],
     "relation": null | "to the left of" | "to the right of" | "above" | "below",
     "caption": ..., "template": "a photo of {}", "split": "train" | "val",
     "holdout": bool, "size": S}

Geometry (all integers, pixels of the final image). ``bbox`` is half-open: the object covers
columns ``x0 .. x1-1`` and rows ``y0 .. y1-1``; every bbox is square with side in
``[ceil(0.25 S), floor(0.45 S)]``. Shapes fill their bbox: ``square`` all of it, ``circle`` the
inscribed disc, ``triangle`` an isosceles triangle, apex up (top centre), base on the bottom edge.
Shapes are drawn at 4x with ``ImageDraw`` and box-downsampled (``Image.reduce``), so edges are
anti-aliased blends with white, every pixel fully inside a shape is its exact fill RGB and every
pixel outside all bboxes is exactly white.

Relation (first-named object = subject A, second = object B), e.g. "A to the left of B" iff
  (1) the gap along the relation axis is at least ``margin = max(1, S // 16)``:
      ``B.x0 - A.x1 >= margin`` (right of: ``A.x0 - B.x1``; above: ``B.y0 - A.y1``; below:
      ``A.y0 - B.y1``), and
  (2) the extents across the axis overlap by at least half the smaller side:
      ``min(A.y1, B.y1) - max(A.y0, B.y0) >= ceil(min(sA, sB) / 2)``.
Hence the bboxes never overlap and, for the centres, ``cx_B - cx_A > |cy_B - cy_A|`` (the centre
offset lies strictly within 45 degrees of the relation axis): exactly one relation holds.
Two objects in one image never share both colour and shape (no "a red circle left of a red
circle"; such a caption would also be true reversed).

Splits and holdout. ``--holdout red:circle`` keeps every sample containing a red circle out of
train; ``--holdout red:circle,blue:square`` keeps every sample containing both objects (either
order, any relation) out of train. Val is drawn from the full distribution, except that with
holdouts a fraction ``val_holdout_fraction`` (default 0.5) of val samples are probes built
around a held-out item chosen uniformly (an object alone or with a random partner; a combination
in random order and relation). ``truth["holdout"]`` marks every sample containing a held-out item.

Determinism: sample ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, s_id, i])``;
tars are written with fixed metadata, sorted members and fixed PNG settings, so shards are
byte-identical across runs and worker counts.
"""
