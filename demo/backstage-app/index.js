// Backstage's own backend with its catalog plugin, nothing else: configuration comes from the
// --config files demo/backstage.py writes (port, PostgreSQL, catalog locations).
const { createBackend } = require('@backstage/backend-defaults');

const backend = createBackend();
backend.add(import('@backstage/plugin-catalog-backend'));
backend.start();
