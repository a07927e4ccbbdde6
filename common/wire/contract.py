"""What every side of the wire agrees on, importable without torch: the protocol version and the names of
the hidden states' wire formats (the command lines offer exactly these; common/wire/codec.py encodes them)."""

PROTOCOL_VERSION = 1
FLOAT_WIRE_DTYPES = ("float32", "bfloat16", "float16")
WIRE_FORMATS = (*FLOAT_WIRE_DTYPES, "int8")  # what a session may choose for its hidden states
