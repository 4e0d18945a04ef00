"""Forwarding alarms to alarm-handling software: the SIA DC-09 protocol (`dc09`) and our
event types in SIA and Contact ID codes (`codes`). Pure code: imports only the domain."""
