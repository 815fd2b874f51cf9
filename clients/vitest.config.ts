import { defineConfig } from 'vitest/config';

// Three projects: the client in Node (unit tests and tests against a real server), the React hooks in
// happy-dom (against a real server), and the browser end-to-end tests of the demo page (Chromium).
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    teardownTimeout: 15_000,
    projects: [
      {
        test: {
          name: 'client',
          environment: 'node',
          include: ['typescript/test/**/*.test.ts'],
        },
      },
      {
        test: {
          name: 'react',
          environment: 'happy-dom',
          include: ['typescript/test/**/*.test.tsx'],
        },
      },
      {
        test: {
          name: 'e2e',
          environment: 'node',
          include: ['e2e/**/*.test.ts'],
          testTimeout: 120_000,
          // One browser at a time: the machine has two cores.
          fileParallelism: false,
        },
      },
    ],
  },
});
