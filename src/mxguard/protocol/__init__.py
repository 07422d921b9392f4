"""Pure protocol code: parse, validate, serialise and match. No sockets, no clocks, no globals."""
