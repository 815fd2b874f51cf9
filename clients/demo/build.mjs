// Bundles the demo page's script into OUT_DIR/app.js, which the jobcast binary embeds; index.html and
// app.css need no build, so the binary embeds them straight from demo/src.
// Usage: node demo/build.mjs OUT_DIR   (from clients/; `npm run build:demo` writes ../src/demo).
// The output is reproducible byte for byte: fixed names, no hashes, no timestamps, no absolute paths.

import { build } from 'esbuild';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2];
if (!out) {
  console.error('usage: node demo/build.mjs OUT_DIR');
  process.exit(2);
}
const outDir = resolve(out);
mkdirSync(outDir, { recursive: true });

const banner = '/* jobcast demo page: built from clients/demo by `npm run build:demo` in clients/ */';

const result = await build({
  absWorkingDir: here,
  entryPoints: ['src/main.tsx'],
  bundle: true,
  write: false,
  format: 'iife',
  platform: 'browser',
  target: ['es2020', 'chrome100', 'firefox100', 'safari15'],
  minify: true,
  legalComments: 'none',
  charset: 'utf8',
  jsx: 'automatic',
  define: { 'process.env.NODE_ENV': '"production"' },
  alias: {
    '@jobcast/client/react': resolve(here, '../typescript/src/react.ts'),
    '@jobcast/client': resolve(here, '../typescript/src/index.ts'),
  },
  banner: { js: banner },
  outfile: 'app.js',
  logLevel: 'warning',
});
const js = result.outputFiles[0].text;
writeFileSync(join(outDir, 'app.js'), js.endsWith('\n') ? js : js + '\n');
console.log(`demo script built into ${outDir}: app.js (${js.length} bytes)`);
