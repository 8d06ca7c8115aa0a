"""The d8 UNet: its one Keras definition and Theano weights loader (``d8``), and
inference over 8-slice windows (``infer``).

Keras and its backend are imported only when a model is built, so importing
this package stays cheap.
"""
