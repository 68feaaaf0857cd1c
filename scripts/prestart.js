#!/usr/bin/env node
// Runs before `npm start`. A checkout compiles the TypeScript first; an
// install without dev dependencies (the production image, `npm ci
// --omit=dev`) has no compiler and runs the compiled code it was given.
'use strict'
const { spawnSync } = require('node:child_process')
const { existsSync } = require('node:fs')
const { join } = require('node:path')

const root = join(__dirname, '..')
let compiler = null
try {
  compiler = require.resolve('typescript/bin/tsc', { paths: [root] })
} catch {
  // Not installed: dev dependencies were left out.
}
if (compiler !== null) {
  const build = spawnSync(process.execPath, [compiler, '-p', 'tsconfig.json'], { cwd: root, stdio: 'inherit' })
  process.exit(build.status ?? 1)
}
if (!existsSync(join(root, 'dist', 'src', 'server.js'))) {
  process.stderr.write('npm start: dist/src/server.js is missing and TypeScript is not installed to compile it: run `npm ci` (with dev dependencies), then `npm start`\n')
  process.exit(1)
}
