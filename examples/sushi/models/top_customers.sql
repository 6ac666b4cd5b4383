MODEL (
  name sushi.top_customers,
  kind VIEW
);

SELECT customer_id, items
FROM sushi.customer_totals
ORDER BY items DESC, customer_id
LIMIT 3
