"""Cache classes that quantize what they hold."""
