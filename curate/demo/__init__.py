"""The bundled examples: the sample catalog (``example``) and the end-to-end demo (``pipeline``)."""
