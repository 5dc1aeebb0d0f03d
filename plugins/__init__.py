"""Built-in component plugins, registered through entry points exactly like third-party ones."""
