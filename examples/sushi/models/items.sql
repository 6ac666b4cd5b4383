MODEL (
  name sushi.items,
  kind SEED (path '../seeds/items.csv'),
  columns (item_id INT, name TEXT, price DECIMAL(10, 2)),
  grain item_id,
  description 'The menu'
);
