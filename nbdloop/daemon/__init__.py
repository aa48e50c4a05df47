"""The daemon that owns every attached device."""
