"""Configuration: process settings, the route file loader, findings and reload."""
