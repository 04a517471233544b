"""The lecture's training app, beside the deriver's stages: data, the network on generated code, ``derive train``.

Nothing in the deriver imports it; it imports only the generated modules and the standard tools.
"""
