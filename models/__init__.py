"""samcp.models: torch modules and losses for the heads. Imports nothing from pipeline/ or cli/."""
