// Serves the Kinesis API in memory (kinesalite, from npm) on 127.0.0.1:PORT, for
// the tests: `node scripts/kinesalite.js PORT`, with NODE_PATH pointing at the
// node_modules that scripts/deps.sh installs. Streams turn ACTIVE after 50 ms.
const kinesalite = require('kinesalite');

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node scripts/kinesalite.js PORT');
  process.exit(2);
}
const server = kinesalite({
  createStreamMs: 50,
  deleteStreamMs: 50,
  updateStreamMs: 50,
  shardLimit: 100,
});
server.listen(port, '127.0.0.1', (err) => {
  if (err) {
    console.error(`kinesalite: ${err}`);
    process.exit(1);
  }
  console.log(`kinesalite listening on 127.0.0.1:${port}`);
});
