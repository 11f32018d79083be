"""The contract other programs code against: commands, events, stream and key names, codec."""
