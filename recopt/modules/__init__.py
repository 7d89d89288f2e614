"""nn.Modules that optimized graphs call at run time.

A pass that puts a module into a graph builds it from here (or calls a
function from :mod:`recopt.ops`), never from a pass module or from
:mod:`recopt.models`: the graph keeps working wherever the pass that made it
lives, and ``recopt.models`` may import from here, never the other way.

- :mod:`recopt.modules.attention`: ``MultiHeadAttention`` and Kunlun's ``HSP``
  (inserted by the ``hsp`` pass; also built by the bundled Kunlun model).
"""
